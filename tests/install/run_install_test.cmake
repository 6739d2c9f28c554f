# Installs a build of moejit into a fresh prefix, then configures, builds and runs the consumer
# project (consumer/) against it, and runs the installed CLI. Called by ctest with
# -DBUILD_DIR=... -DWORK_DIR=... -DCONSUMER_DIR=... -DGENERATOR=... -DCXX=... -DCONFIG=...
set(prefix ${WORK_DIR}/prefix)
set(consumer_build ${WORK_DIR}/consumer-build)
file(REMOVE_RECURSE ${WORK_DIR})
file(MAKE_DIRECTORY ${WORK_DIR})

# Runs one step; fails the test with its output when it exits non-zero. Output goes to OUT_VAR.
function(step what out_var)
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
  if(NOT rc STREQUAL "0")
    string(REPLACE ";" " " command "${ARGN}")
    message(FATAL_ERROR "${what} failed (${rc}): ${command}\n${out}\n${err}")
  endif()
  set(${out_var} "${out}" PARENT_SCOPE)
endfunction()

set(config_args)
if(CONFIG)
  set(config_args --config ${CONFIG})
endif()
step("install" out ${CMAKE_COMMAND} --install ${BUILD_DIR} --prefix ${prefix} ${config_args})
foreach(f include/moejit/moejit.h bin/moejit)
  if(NOT EXISTS ${prefix}/${f})
    message(FATAL_ERROR "the install has no ${f}:\n${out}")
  endif()
endforeach()

step("configure the consumer" out
     ${CMAKE_COMMAND} -S ${CONSUMER_DIR} -B ${consumer_build} -G ${GENERATOR}
     -DCMAKE_CXX_COMPILER=${CXX} -DCMAKE_PREFIX_PATH=${prefix}
     -DCMAKE_DISABLE_FIND_PACKAGE_fmt=ON -DCMAKE_BUILD_TYPE=Release)
step("build the consumer" out ${CMAKE_COMMAND} --build ${consumer_build})
step("run the consumer" out ${consumer_build}/moejit_consumer)
if(NOT out MATCHES "consumer ok")
  message(FATAL_ERROR "the consumer printed:\n${out}")
endif()

# The installed CLI must find the installed library without LD_LIBRARY_PATH.
step("run the installed CLI" out
     ${CMAKE_COMMAND} -E env --unset=LD_LIBRARY_PATH
     ${prefix}/bin/moejit dump --preset qwen3-30b-a3b --emit ir)
if(NOT out MATCHES "method=RenormalizeNaive experts=128")
  message(FATAL_ERROR "the installed CLI printed:\n${out}")
endif()
message(STATUS "installed into ${prefix}; consumer and CLI ran")
