// lattice::advise_huge_pages for CPU tensors: the huge-page advice of the kernels' large outputs
// (lattice/cpu/huge_pages.h), offered to Python for the buffers it allocates (embedding tables, optimizer state).
#include <ATen/ATen.h>
#include <torch/library.h>

#include "lattice/cpu/huge_pages.h"
#include "lattice/cpu/register.h"

namespace lattice {
namespace cpu {
namespace {

bool advise_huge_pages_cpu(const at::Tensor& self) {
  TORCH_CHECK(self.is_contiguous(), "advise_huge_pages: self must be contiguous, got strides ", self.strides(),
              " for shape ", self.sizes());
  if (self.nbytes() == 0) return false;
  return advise_huge_pages(self.data_ptr(), self.nbytes());
}

}  // namespace
}  // namespace cpu
}  // namespace lattice

LATTICE_REGISTER_CPU_KERNELS(huge_pages, m) {
  m.impl("advise_huge_pages", &lattice::cpu::advise_huge_pages_cpu);
}
