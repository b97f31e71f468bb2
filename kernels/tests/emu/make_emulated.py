"""Rewrite a .cu file for the CPU emulator (emu.h): `kernel<<<grid, block, smem, stream>>>(args)`
becomes `::emu::launch(kernel, grid, block, smem, stream, args)`. Nothing else changes.

    python make_emulated.py IN.cu OUT.cpp
"""

import re
import sys

LAUNCH = re.compile(r"([A-Za-z_][\w:]*(?:<[^;<>()]*>)?)<<<(.*?)>>>\(", re.S)


def rewrite(text: str) -> str:
    out, n = LAUNCH.subn(lambda m: f"::emu::launch({m.group(1)}, {m.group(2)}, ", text)
    if n == 0 and "<<<" in text:
        raise SystemExit("make_emulated.py: found '<<<' it could not rewrite")
    if "<<<" in out:
        raise SystemExit("make_emulated.py: a launch was left unrewritten")
    return out


if __name__ == "__main__":
    src, dst = sys.argv[1:3]
    with open(src) as f:
        text = f.read()
    with open(dst, "w") as f:
        f.write(f'#include "emu.h"\n#line 1 "{src}"\n' + rewrite(text))
