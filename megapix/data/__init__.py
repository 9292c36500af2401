from megapix.data.palette import Palette
from megapix.data.splits import fit_palette, load_splits
from megapix.data.sources import Source, Split, open_source

__all__ = ["Palette", "Source", "Split", "fit_palette", "load_splits", "open_source"]
