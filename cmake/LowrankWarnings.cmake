# Warnings for our own targets only (third-party headers stay quiet).
function(lowrank_ops_warnings target)
  target_compile_options(${target} PRIVATE
    $<$<COMPILE_LANGUAGE:CXX>:-Wall -Wextra -Wno-unused-parameter>
    $<$<COMPILE_LANGUAGE:CUDA>:-Xcompiler=-Wall --Werror=all-warnings>)
endfunction()
