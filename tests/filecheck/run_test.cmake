# Runs one FileCheck test: every line "// RUN: <args>" of TEST becomes
#   moejit <args> | FileCheck TEST [--check-prefix=P]
# where "RUN(P):" selects a check prefix. Fails on the first failing RUN line.
file(STRINGS ${TEST} lines REGEX "^// RUN")
if(NOT lines)
  message(FATAL_ERROR "${TEST} has no RUN line")
endif()
foreach(line IN LISTS lines)
  string(REGEX MATCH "^// RUN(\\(([A-Za-z0-9_-]+)\\))?: (.*)$" _ "${line}")
  set(prefix "${CMAKE_MATCH_2}")
  separate_arguments(args UNIX_COMMAND "${CMAKE_MATCH_3}")
  set(fc_args ${TEST})
  if(prefix)
    list(APPEND fc_args --check-prefix=${prefix})
  endif()
  execute_process(COMMAND ${MOEJIT} ${args} COMMAND ${FILECHECK} ${fc_args}
                  RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "RUN failed (${rc}): moejit ${CMAKE_MATCH_3}\n${out}\n${err}")
  endif()
endforeach()
