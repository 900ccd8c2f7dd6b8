"""Export a saved LoRA folder for AUTOMATIC1111 / ComfyUI / Forge (kohya layout).

Thin wrapper over `refl.cli.export_main` (`python scripts/export_lora.py --help`); installed as
`social-refl-export-lora`."""

import sys

from refl.cli import export_main as main

if __name__ == "__main__":
    sys.exit(main())
