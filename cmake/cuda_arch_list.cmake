# The default TORCH_CUDA_ARCH_LIST of epa_ext's CUDA kernels (README, "GPUs"): native code for the
# data-center and consumer GPUs of the last generations that this nvcc can compile for (sm_80
# A100, sm_90 H100/H200, sm_100 B200/GB200, sm_120 RTX 50xx / RTX PRO Blackwell) and for the GPU
# visible at build time, plus PTX of the newest architecture nvcc knows, which the driver compiles
# for any later GPU. TORCH_CUDA_ARCH_LIST set in the environment replaces all of it.
#
# Also a script: cmake -DNVCC=<nvcc> [-DLOCAL_GPU=<major.minor>] -P cmake/cuda_arch_list.cmake
# prints the list (python_tests/test_cuda_build.py checks it without a GPU).

if(CMAKE_SCRIPT_MODE_FILE AND NOT CMAKE_PARENT_LIST_FILE)
  cmake_minimum_required(VERSION 3.26)  # as a script: the policies of the build
endif()

# epa_ext_cuda_arch_list(<out> <nvcc> <the local GPU's capability as "major.minor", or "">)
function(epa_ext_cuda_arch_list out nvcc local_gpu)
  execute_process(COMMAND "${nvcc}" --list-gpu-arch OUTPUT_VARIABLE _listed OUTPUT_STRIP_TRAILING_WHITESPACE
                  RESULT_VARIABLE _status)
  if(NOT _status EQUAL 0)
    message(FATAL_ERROR "epa_ext: '${nvcc} --list-gpu-arch' failed; set TORCH_CUDA_ARCH_LIST")
  endif()
  string(REGEX MATCHALL "compute_[0-9]+" _computes "${_listed}")
  set(_supported "")
  foreach(_c ${_computes})
    string(REPLACE "compute_" "" _n "${_c}")
    list(APPEND _supported ${_n})
  endforeach()
  list(SORT _supported COMPARE NATURAL)
  list(GET _supported -1 _newest)
  set(_wanted 80 90 100 120)
  if(local_gpu)
    string(REPLACE "." "" _local "${local_gpu}")
    list(APPEND _wanted ${_local})
  endif()
  list(APPEND _wanted ${_newest})
  list(REMOVE_DUPLICATES _wanted)
  list(SORT _wanted COMPARE NATURAL)
  set(_archs "")
  foreach(_n ${_wanted})
    if(NOT _n IN_LIST _supported)
      continue()
    endif()
    math(EXPR _major "${_n} / 10")
    math(EXPR _minor "${_n} % 10")
    set(_arch "${_major}.${_minor}")
    if(_n EQUAL _newest)
      string(APPEND _arch "+PTX")
    endif()
    list(APPEND _archs "${_arch}")
  endforeach()
  set(${out} "${_archs}" PARENT_SCOPE)
endfunction()

if(CMAKE_SCRIPT_MODE_FILE AND NOT CMAKE_PARENT_LIST_FILE)
  epa_ext_cuda_arch_list(_list "${NVCC}" "${LOCAL_GPU}")
  message("${_list}")
endif()
