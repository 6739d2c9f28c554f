// Values made once per key across the threads of a process: the kernel cache's memory level and
// the compiled layers. The first caller of a key makes its value, outside the map's lock, so
// hits and other keys go on meanwhile; callers that come while it is made wait for it and get
// the value or the exception; a failed make leaves no entry, so a later call makes it again.
#pragma once

#include <chrono>
#include <future>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <unordered_map>
#include <vector>

namespace moejit::runtime {

template <class V>
class OnceMap {
 public:
  using Value = std::shared_ptr<const V>;

  // The value for key: make() here when no entry exists, else the entry's value, waited for if
  // another thread is making it; before_wait() is called first then (it may throw instead).
  template <class Make, class BeforeWait>
  Value get(const std::string& key, Make&& make, BeforeWait&& before_wait) {
    std::optional<std::promise<Value>> promise;  // (this call makes it)
    std::shared_ptr<Slot> slot;
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto it = slots_.find(key);
      if (it != slots_.end()) {
        slot = it->second;
      } else {
        promise.emplace();
        slot = std::make_shared<Slot>(Slot{promise->get_future().share()});
        slots_.emplace(key, slot);
      }
    }
    if (!promise) {
      if (!slot->done()) before_wait();
      return slot->ready.get();
    }
    try {
      Value v = make();
      promise->set_value(v);
      return v;
    } catch (...) {
      promise->set_exception(std::current_exception());
      std::lock_guard<std::mutex> lock(mu_);
      auto it = slots_.find(key);
      if (it != slots_.end() && it->second == slot) slots_.erase(it);
      throw;
    }
  }

  void clear() {
    std::lock_guard<std::mutex> lock(mu_);
    slots_.clear();
  }

  // Removes the made entries whose key pred accepts and returns their values, so that the caller
  // drops its references outside the lock. Entries still being made stay (their makers and
  // waiters would otherwise get a value the map no longer holds).
  template <class Pred>
  std::vector<Value> take_made_if(Pred&& pred) {
    std::vector<Value> taken;
    std::lock_guard<std::mutex> lock(mu_);
    for (auto it = slots_.begin(); it != slots_.end();) {
      if (it->second->done() && pred(it->first)) {
        try {
          taken.push_back(it->second->ready.get());
        } catch (...) {  // (a failed make, between its set_exception and its own erase)
        }
        it = slots_.erase(it);
      } else {
        ++it;
      }
    }
    return taken;
  }

  // For pthread_atfork handlers: the lock held across fork(); in the child, the entries still
  // being made are dropped (their threads are not in the child, so nothing would complete
  // them) before the lock is freed.
  void lock_for_fork() { mu_.lock(); }
  void unlock_in_parent() { mu_.unlock(); }
  void unlock_in_child() {
    for (auto it = slots_.begin(); it != slots_.end();)
      it = it->second->done() ? std::next(it) : slots_.erase(it);
    mu_.unlock();
  }

 private:
  struct Slot {
    std::shared_future<Value> ready;
    bool done() const {
      return ready.wait_for(std::chrono::seconds(0)) == std::future_status::ready;
    }
  };
  std::mutex mu_;
  std::unordered_map<std::string, std::shared_ptr<Slot>> slots_;
};

}  // namespace moejit::runtime
