# CUDA detection.  LOWRANK_OPS_CUDA = AUTO | ON | OFF
#   AUTO: compile the CUDA kernels whenever nvcc is found; no GPU is needed to compile.
#   ON:   nvcc is required (configure fails without it).
#   OFF:  CPU kernels only.
# LOWRANK_OPS_CUDA_ARCHS: explicit architecture list (never "native": it needs a visible GPU).
# The CUDA runtime is linked statically so that _C imports on machines without a driver.
set(LOWRANK_OPS_CUDA "AUTO" CACHE STRING "Build the CUDA kernels: AUTO, ON or OFF")
set_property(CACHE LOWRANK_OPS_CUDA PROPERTY STRINGS AUTO ON OFF)
set(LOWRANK_OPS_CUDA_ARCHS "80;90" CACHE STRING "CUDA architectures to compile for")
string(TOUPPER "${LOWRANK_OPS_CUDA}" _lowrank_cuda_mode)

set(LOWRANK_OPS_WITH_CUDA OFF)
if(NOT _lowrank_cuda_mode MATCHES "^(AUTO|ON|OFF)$")
  message(FATAL_ERROR "LOWRANK_OPS_CUDA must be AUTO, ON or OFF; got '${LOWRANK_OPS_CUDA}'")
endif()

if(NOT _lowrank_cuda_mode STREQUAL "OFF")
  if(NOT CMAKE_CUDA_COMPILER)
    # nvcc is often installed without being on PATH; look in the usual toolkit places too.
    find_program(_lowrank_nvcc nvcc HINTS ENV CUDA_HOME ENV CUDA_PATH PATH_SUFFIXES bin
                 PATHS /usr/local/cuda/bin)
    if(_lowrank_nvcc)
      set(CMAKE_CUDA_COMPILER "${_lowrank_nvcc}")
    endif()
  endif()
  include(CheckLanguage)
  check_language(CUDA)
  if(CMAKE_CUDA_COMPILER)
    # Must be set before enable_language, or CMake probes a default architecture.
    set(CMAKE_CUDA_ARCHITECTURES "${LOWRANK_OPS_CUDA_ARCHS}")
    set(CMAKE_CUDA_RUNTIME_LIBRARY Static)
    enable_language(CUDA)
    find_package(CUDAToolkit REQUIRED)
    set(CMAKE_CUDA_STANDARD 17)
    set(CMAKE_CUDA_STANDARD_REQUIRED ON)
    set(LOWRANK_OPS_WITH_CUDA ON)
    message(STATUS "lowrank_ops: CUDA kernels ON (nvcc ${CMAKE_CUDA_COMPILER_VERSION}, archs ${LOWRANK_OPS_CUDA_ARCHS})")
  elseif(_lowrank_cuda_mode STREQUAL "ON")
    message(FATAL_ERROR "LOWRANK_OPS_CUDA=ON but no CUDA compiler (nvcc) was found; "
                        "put nvcc on PATH or set CUDA_HOME, or use LOWRANK_OPS_CUDA=AUTO/OFF")
  else()
    message(STATUS "lowrank_ops: nvcc not found, CUDA kernels OFF")
  endif()
else()
  message(STATUS "lowrank_ops: CUDA kernels OFF (LOWRANK_OPS_CUDA=OFF)")
endif()
