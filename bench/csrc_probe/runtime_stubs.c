/* Stand-ins for the CUDA runtime entry points that nvcc's host code calls, so that a csrc object links and
 * its launch functions run on a machine without a GPU (bench/static.py). Kernel registration records each
 * host stub's device name; cudaFuncSetAttribute prints the dynamic shared memory a launch asks for; every
 * launch does nothing and succeeds. Plain C without CUDA headers: only the symbol names must match, so
 * one file serves CUDA 12 (cudaLaunchKernel) and 13 (__cudaGetKernel / __cudaLaunchKernel). */
#include <stdio.h>

enum { MAX_KERNELS = 256, MAX_DYNAMIC_SHARED_MEMORY_SIZE = 8 /* cudaFuncAttributeMaxDynamicSharedMemorySize */ };
static const void *host_stub[MAX_KERNELS];
static const char *device_name[MAX_KERNELS];
static int kernels;
static void *handle[1];

void **__cudaRegisterFatBinary(void *fatbin) { (void)fatbin; return handle; }
void __cudaRegisterFatBinaryEnd(void **h) { (void)h; }
void __cudaUnregisterFatBinary(void **h) { (void)h; }
void __cudaRegisterFunction(void **h, const char *host_fun, char *device_fun, const char *name, int thread_limit,
                            void *tid, void *bid, void *block, void *grid, int *warp_size) {
  (void)h; (void)device_fun; (void)thread_limit; (void)tid; (void)bid; (void)block; (void)grid; (void)warp_size;
  if (kernels < MAX_KERNELS) {
    host_stub[kernels] = host_fun;
    device_name[kernels++] = name;
  }
}
void __cudaRegisterVar(void) {}
int cudaFuncSetAttribute(const void *func, int attr, int value) {
  for (int i = 0; i < kernels; ++i)
    if (attr == MAX_DYNAMIC_SHARED_MEMORY_SIZE && host_stub[i] == func) printf("smem %s %d\n", device_name[i], value);
  return 0;
}
unsigned __cudaPushCallConfiguration(void) { return 0; }
int __cudaPopCallConfiguration(void) { return 0; }
int __cudaGetKernel(void **kernel, const void *func) { *kernel = (void *)func; return 0; }
int __cudaLaunchKernel(void) { return 0; }
int __cudaLaunchKernel_ptsz(void) { return 0; }
int cudaLaunchKernel(void) { return 0; }
int cudaGetLastError(void) { return 0; }
