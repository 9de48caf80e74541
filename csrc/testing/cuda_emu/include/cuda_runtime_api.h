// Shadow of the CUDA header <cuda_runtime_api.h> for emulated builds: everything lives in cuda_emu.h.
#pragma once
#include "../cuda_emu.h"
