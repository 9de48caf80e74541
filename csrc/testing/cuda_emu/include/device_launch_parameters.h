// Shadow of the CUDA header <device_launch_parameters.h> for emulated builds: everything lives in cuda_emu.h.
#pragma once
#include "../cuda_emu.h"
