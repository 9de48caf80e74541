// Shadow of the CUDA header <mma.h> (the warp matrix API) for emulated builds.
#pragma once
#include "../wmma_emu.h"
