// Shadow of the CUDA header <cuda.h> for emulated builds: everything lives in cuda_emu.h.
#pragma once
#include "../cuda_emu.h"
