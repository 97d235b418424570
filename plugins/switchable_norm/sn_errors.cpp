// Error strings of the C API, compiled into every library that exposes it.
#include "sn_kernels.h"

extern "C" const char* sn_error_string(int code) {
  switch (code) {
    case SN_OK: return "ok";
    case SN_ERR_INVALID_ARGUMENT:
      return "invalid argument (null pointer, non-positive size, or running statistics missing "
             "while using_bn is set)";
    case SN_ERR_DEGENERATE:
      return "one element per normalized group: the unbiased variance divides by zero (spatial "
             "size 1, or C = 1 for rank-2 input)";
    case SN_ERR_CUDA: return "a CUDA launch failed";
    default: return "unknown error";
  }
}
