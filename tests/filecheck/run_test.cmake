# Runs one FileCheck test. Each RUN line of TEST is one check:
#   // RUN: <args>          moejit <args> | FileCheck TEST               (moejit must exit 0)
#   // RUN(P): <args>       the same with --check-prefix=P
#   // RUN-FAIL: <args>     moejit <args> must exit non-zero (not crash); its stdout then stderr
#                           go to FileCheck TEST --check-prefix=FAIL
#   // RUN-FAIL(P): <args>  the same with --check-prefix=P
# In <args>, %s is TEST's path and %S its folder (as in LLVM lit), so a test names its inputs
# as %S/inputs/NAME. Leading NAME=VALUE words set environment variables for moejit
# (e.g. `// RUN(P): MOEJIT_PLAN_OVERRIDE=tma=0 dump ...`). Fails on the first failing RUN line, printing the command and FileCheck's
# report. Called by ctest with -DTEST=... -DMOEJIT=... -DFILECHECK=... -DWORK_DIR=...
file(STRINGS ${TEST} lines REGEX "^// RUN")
if(NOT lines)
  message(FATAL_ERROR "${TEST} has no RUN line")
endif()
get_filename_component(test_dir ${TEST} DIRECTORY)
get_filename_component(test_name ${TEST} NAME_WE)
if(NOT WORK_DIR)
  set(WORK_DIR ${CMAKE_CURRENT_BINARY_DIR})
endif()

# Prints details unwrapped (message(FATAL_ERROR) reflows text), then fails with a summary.
function(fail summary details)
  message("${details}")
  message(FATAL_ERROR "${TEST}: ${summary}")
endfunction()

set(index 0)
foreach(line IN LISTS lines)
  math(EXPR index "${index} + 1")
  if(NOT line MATCHES "^// RUN(-FAIL)?(\\(([A-Za-z0-9_-]+)\\))?: (.*)$")
    message(FATAL_ERROR "${TEST}: malformed RUN line (expected '// RUN[-FAIL][(PREFIX)]: args'):\n"
                        "${line}")
  endif()
  set(expect_fail "${CMAKE_MATCH_1}")
  set(prefix "${CMAKE_MATCH_3}")
  set(command_text "${CMAKE_MATCH_4}")
  string(REPLACE "%s" "${TEST}" command_text "${command_text}")
  string(REPLACE "%S" "${test_dir}" command_text "${command_text}")
  separate_arguments(args UNIX_COMMAND "${command_text}")
  set(env_args)
  while(args)
    list(GET args 0 first)
    if(NOT first MATCHES "^[A-Z_][A-Z0-9_]*=")
      break()
    endif()
    list(APPEND env_args "${first}")
    list(REMOVE_AT args 0)
  endwhile()
  set(moejit_cmd ${MOEJIT})
  if(env_args)
    set(moejit_cmd ${CMAKE_COMMAND} -E env ${env_args} ${MOEJIT})
  endif()
  if(expect_fail AND NOT prefix)
    set(prefix FAIL)
  endif()
  set(fc_args ${TEST})
  if(prefix)
    list(APPEND fc_args --check-prefix=${prefix})
  endif()

  if(NOT expect_fail)
    execute_process(COMMAND ${moejit_cmd} ${args} COMMAND ${FILECHECK} ${fc_args}
                    RESULTS_VARIABLE rcs OUTPUT_VARIABLE out ERROR_VARIABLE err)
    list(GET rcs 0 moejit_rc)
    list(GET rcs 1 filecheck_rc)
    if(NOT moejit_rc EQUAL 0)
      fail("RUN line ${index} exited with ${moejit_rc}: moejit ${command_text}" "${err}")
    endif()
    if(NOT filecheck_rc EQUAL 0)
      fail("RUN line ${index} failed its checks: moejit ${command_text}" "${out}${err}")
    endif()
    continue()
  endif()

  # RUN-FAIL: the failure must be an orderly exit code (a signal reads as text, e.g.
  # "Segmentation fault"), and its message must match the checks.
  execute_process(COMMAND ${moejit_cmd} ${args} RESULT_VARIABLE moejit_rc
                  OUTPUT_VARIABLE out ERROR_VARIABLE err)
  if(moejit_rc STREQUAL "0")
    fail("RUN-FAIL line ${index} exited with 0, expected a failure: moejit ${command_text}"
         "${out}${err}")
  endif()
  if(NOT moejit_rc MATCHES "^[0-9]+$")
    fail("RUN-FAIL line ${index} did not exit cleanly (${moejit_rc}): moejit ${command_text}"
         "${out}${err}")
  endif()
  set(captured ${WORK_DIR}/${test_name}.run${index}.txt)
  file(WRITE ${captured} "${out}${err}")
  execute_process(COMMAND ${FILECHECK} ${fc_args} --input-file=${captured}
                  RESULT_VARIABLE filecheck_rc OUTPUT_VARIABLE fc_out ERROR_VARIABLE fc_err)
  if(NOT filecheck_rc EQUAL 0)
    fail("RUN-FAIL line ${index} (exit ${moejit_rc}) failed its checks: moejit ${command_text}"
         "${fc_out}${fc_err}")
  endif()
endforeach()
