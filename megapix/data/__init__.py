from megapix.data.palette import Palette
from megapix.data.sources import Source, Split, open_source

__all__ = ["Palette", "Source", "Split", "open_source"]
