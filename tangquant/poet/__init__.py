"""The built-in tiny Tang poet: the model builder, its data preparation and training (tools, not pipeline).

The trained poet ships in ``tangquant/assets/demo`` and is what ``tangquant demo`` runs.
"""

from pathlib import Path

ASSETS = Path(__file__).resolve().parent.parent / "assets" / "demo"


def demo_paths(root: Path = ASSETS) -> dict[str, Path]:
    return {"base": root / "base", "adapter": root / "adapter", "card": root / "README.md",
            "prompts": root / "prompts.json", "draft": root / "draft"}
