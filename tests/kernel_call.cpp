// Call kernels of a compiled model.so, each on arguments read from a file, and write every tensor argument
// back after the call (tests/test_embed_cpp.py runs it under qemu-aarch64 to compare kernels across
// architectures; one run for all of them, as qemu takes about a second to start the TVM runtime).
// Usage: kernel_call LIB NAME ARGS OUT [NAME ARGS OUT ...]
// ARGS: u32 count, then per argument u8 kind; kind 0 (tensor): u8 type code, u8 bits, u32 ndim,
// i64 shape[ndim], the data; kind 1: an i64 scalar. OUT: the tensors' data after the call, in order.
#include <tvm/ffi/container/shape.h>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/extra/module.h>
#include <tvm/ffi/function.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <vector>

namespace ffi = tvm::ffi;

struct AlignedCPUAlloc {
  void AllocData(DLTensor* t) { t->data = std::aligned_alloc(64, (ffi::GetDataSize(*t) + 63) / 64 * 64 + 64); }
  void FreeData(DLTensor* t) { std::free(t->data); }
};

template <typename T>
static T Read(std::ifstream& in) {
  T value;
  in.read(reinterpret_cast<char*>(&value), sizeof value);
  return value;
}

// Call kernel `name` of `lib` on the arguments in file `args_path`; write its tensors to `out_path`.
static void Call(const ffi::Module& lib, const char* name, const char* args_path, const char* out_path) {
  std::ifstream in(args_path, std::ios::binary);
  std::vector<ffi::Any> args;
  std::vector<ffi::Tensor> tensors;
  for (uint32_t i = 0, n = Read<uint32_t>(in); i < n; ++i) {
    if (Read<uint8_t>(in) == 1) {
      args.push_back(Read<int64_t>(in));
      continue;
    }
    uint8_t code = Read<uint8_t>(in), bits = Read<uint8_t>(in);
    std::vector<int64_t> shape(Read<uint32_t>(in));
    for (int64_t& extent : shape) extent = Read<int64_t>(in);
    ffi::Tensor t = ffi::Tensor::FromNDAlloc(AlignedCPUAlloc(), ffi::Shape(shape.begin(), shape.end()),
                                             DLDataType{code, bits, 1}, DLDevice{kDLCPU, 0});
    in.read(static_cast<char*>(t.data_ptr()), ffi::GetDataSize(*t.GetDLTensorPtr()));
    tensors.push_back(t);
    args.push_back(t);
  }
  std::vector<ffi::AnyView> views(args.begin(), args.end());
  ffi::Any result;
  lib->GetFunction(name, true).value().CallPacked(views.data(), static_cast<int32_t>(views.size()), &result);
  std::ofstream out(out_path, std::ios::binary);
  for (const ffi::Tensor& t : tensors) out.write(static_cast<char*>(t.data_ptr()), ffi::GetDataSize(*t.GetDLTensorPtr()));
}

int main(int argc, char** argv) {
  if (argc < 5 || (argc - 2) % 3 != 0) {
    std::fprintf(stderr, "usage: %s LIB NAME ARGS OUT [NAME ARGS OUT ...]\n", argv[0]);
    return 2;
  }
  ffi::Module lib = ffi::Module::LoadFromFile(argv[1]);
  for (int i = 2; i < argc; i += 3) Call(lib, argv[i], argv[i + 1], argv[i + 2]);
  return 0;
}
