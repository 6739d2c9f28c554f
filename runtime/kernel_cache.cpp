#include "runtime/kernel_cache.h"

#include <map>
#include <mutex>

namespace moejit::runtime {

KernelCache& KernelCache::global() {
  static KernelCache cache;
  return cache;
}

// Memory level only; the disk level and single-flight are issue 4's.
std::shared_ptr<const KernelBinary> KernelCache::get(const KernelRequest& req,
                                                     const CompileFn& compile) {
  static std::mutex mu;
  static std::map<std::string, std::shared_ptr<const KernelBinary>> memo;
  const std::string key = req.arch + '\n' + req.entry + '\n' + req.source;
  std::lock_guard<std::mutex> lock(mu);
  auto it = memo.find(key);
  if (it != memo.end()) return it->second;
  auto bin = std::make_shared<const KernelBinary>(compile(req));
  memo.emplace(key, bin);
  return bin;
}

}  // namespace moejit::runtime
