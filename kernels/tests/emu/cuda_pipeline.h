// Emulation shim (see emu.h).
#pragma once
#include "emu.h"
