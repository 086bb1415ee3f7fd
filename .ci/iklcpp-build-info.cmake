# CMAKE_PROJECT_INCLUDE for compiling ik-llama-cpp-python 0.1.5 from its source distribution (see
# .ci/iklcpp-cmake-args). The vendored ik_llama.cpp's common/CMakeLists.txt generates common/build-info.cpp
# by running common/cmake/build-info-gen-cpp.cmake, which the sdist leaves out: without it the build stops
# ("No such file or directory"). This writes that script once, before ik_llama.cpp is configured: it fills
# build-info.cpp.in from cmake/build-info.cmake's variables (the commit reads "unknown" outside git).
# It touches nothing in any other project (llama-cpp-python's build included).
set(_tq_ik "${CMAKE_SOURCE_DIR}/vendor/ik_llama.cpp")
if(EXISTS "${_tq_ik}/common/build-info.cpp.in" AND NOT EXISTS "${_tq_ik}/common/cmake/build-info-gen-cpp.cmake")
  file(WRITE "${_tq_ik}/common/cmake/build-info-gen-cpp.cmake"
"include(\${CMAKE_CURRENT_SOURCE_DIR}/cmake/build-info.cmake)
configure_file(\${CMAKE_CURRENT_SOURCE_DIR}/common/build-info.cpp.in \${CMAKE_CURRENT_SOURCE_DIR}/common/build-info.cpp)
")
endif()
