"""Check that a wheel and an sdist carry every built-in config and spec; print their sizes.

Usage: python .ci/check_dist.py WHEEL SDIST (run from the repository root).
"""

import sys
import tarfile
import zipfile
from pathlib import Path

wheel_path, sdist_path = (Path(a) for a in sys.argv[1:3])
wheel = set(zipfile.ZipFile(wheel_path).namelist())
with tarfile.open(sdist_path) as archive:
    sdist = {n.split("/", 1)[1] for n in archive.getnames() if "/" in n}
shipped = sorted(p.relative_to("src").as_posix() for p in Path("src/medanomaly").glob("*/*.yaml"))
missing = [f"wheel lacks {n}" for n in shipped if n not in wheel]
missing += [f"sdist lacks src/{n}" for n in shipped if f"src/{n}" not in sdist]
if missing or not shipped:
    sys.exit("; ".join(missing) or "no built-in configs found under src/medanomaly")
for path, names in ((wheel_path, wheel), (sdist_path, sdist)):
    print(f"{path.name}: {path.stat().st_size / 1024:.0f} KiB, {len(names)} files")
print(f"both carry the {len(shipped)} built-in configs and specs")
