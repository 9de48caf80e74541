// Shadow of the CUDA header <cuda_fp16.h> for emulated builds: everything lives in cuda_emu.h.
#pragma once
#include "../cuda_emu.h"
