# The fuzz smoke test (docs/fuzzing.md), for tests/CMakeLists.txt:
#   include(${CMAKE_CURRENT_SOURCE_DIR}/fuzz_smoke.cmake)
#
# scripts/fuzz.sh smoke builds fuzz/ with clang-14 into <build>/fuzz (its own
# CMake project: the parser sources with ASan + UBSan + libFuzzer) and runs
# every target for 20000 inputs, at most 20 s each, after replaying the saved
# findings in fuzz/corpus/. About 2 minutes to build from scratch on 2 cores,
# 1.5 to 3 minutes to run. Without clang-14 / libfuzzer-14-dev it exits 77,
# which ctest reports as skipped.
add_test(NAME fuzz_smoke
  COMMAND ${CMAKE_COMMAND} -E env TANDEM_FUZZ_BUILD_DIR=${PROJECT_BINARY_DIR}/fuzz
          bash ${PROJECT_SOURCE_DIR}/scripts/fuzz.sh smoke)
set_tests_properties(fuzz_smoke PROPERTIES TIMEOUT 600 SKIP_RETURN_CODE 77 LABELS "fuzz")
