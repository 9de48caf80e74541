// cpp_predict: scores a batch with a lattice serving package (model.pt2) in a C++ process, without Python.
//
//   cpp_predict LIBLATTICE_OPS MODEL_PT2 BATCH_PT [PROBS_PT]
//
// LIBLATTICE_OPS  liblattice_ops.so (python -c "import lattice.ops; print(lattice.ops.library_path())"): the
//                 lattice op schemas and CPU kernels. The package calls lattice's custom ops through
//                 AOTInductor's proxy executor, which looks every one up in the dispatcher when the loader is
//                 built ("Could not find schema" otherwise), so the library is opened first.
// MODEL_PT2       the package written by `lattice export`.
// BATCH_PT        the package's flat inputs, in its manifest's `input_names` order, saved by Python as a list of
//                 tensors with torch.save (save_batch.py writes one from Parquet rows).
// PROBS_PT        optional: the output [B, T] float32 saved for torch.load.
//
// Prints the output, one row per line, tasks separated by spaces (the manifest's task order).
#include <dlfcn.h>

#include <ATen/ATen.h>
#include <c10/core/InferenceMode.h>
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#include <torch/csrc/jit/serialization/pickle.h>

#include <cstdio>
#include <fstream>
#include <iostream>
#include <iterator>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

std::vector<char> read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error("cannot open " + path);
  return std::vector<char>(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

// The list (or tuple) of tensors torch.save wrote.
std::vector<at::Tensor> load_inputs(const std::string& path) {
  const c10::IValue value = torch::jit::pickle_load(read_file(path));
  std::vector<c10::IValue> items;
  if (value.isList()) {
    items = value.toListRef().vec();
  } else if (value.isTuple()) {
    items = value.toTupleRef().elements().vec();
  } else {
    throw std::runtime_error(path + " holds a " + value.tagKind() + ", expected a list of tensors (torch.save(list))");
  }
  std::vector<at::Tensor> inputs;
  for (size_t i = 0; i < items.size(); ++i) {
    if (!items[i].isTensor()) {
      throw std::runtime_error(path + ": item " + std::to_string(i) + " is a " + items[i].tagKind() + ", not a tensor");
    }
    inputs.push_back(items[i].toTensor().contiguous());
  }
  return inputs;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 4 || argc > 5) {
    std::cerr << "usage: " << argv[0] << " LIBLATTICE_OPS MODEL_PT2 BATCH_PT [PROBS_PT]\n";
    return 2;
  }
  // RTLD_GLOBAL is not needed by the dispatcher (registration happens in the library's static initializers), but
  // it keeps the library's symbols visible to anything the package loads later.
  void* ops = dlopen(argv[1], RTLD_NOW | RTLD_GLOBAL);
  if (ops == nullptr) {
    std::cerr << "cpp_predict: error: cannot load " << argv[1] << ": " << dlerror() << "\n";
    return 1;
  }
  if (auto isa = reinterpret_cast<const char* (*)()>(dlsym(ops, "lattice_ops_cpu_isa"))) {
    std::cerr << "liblattice_ops: " << isa() << " kernels\n";
  }
  try {
    const std::vector<at::Tensor> inputs = load_inputs(argv[3]);
    c10::InferenceMode guard;
    torch::inductor::AOTIModelPackageLoader loader(argv[2]);
    const std::vector<at::Tensor> outputs = loader.run(inputs);
    const at::Tensor probs = outputs.at(0).to(at::kFloat).contiguous();
    if (argc == 5) {
      const std::vector<char> bytes = torch::jit::pickle_save(probs);
      std::ofstream out(argv[4], std::ios::binary);
      out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
      if (!out) throw std::runtime_error(std::string("cannot write ") + argv[4]);
    }
    const auto p = probs.accessor<float, 2>();
    for (int64_t b = 0; b < p.size(0); ++b) {
      for (int64_t t = 0; t < p.size(1); ++t) std::printf(t ? " %.9g" : "%.9g", static_cast<double>(p[b][t]));
      std::printf("\n");
    }
  } catch (const std::exception& err) {
    std::cerr << "cpp_predict: error: " << err.what() << "\n";
    return 1;
  }
  return 0;
}
