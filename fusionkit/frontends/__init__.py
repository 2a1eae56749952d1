"""Signal front-ends (waveform -> features).

Importing this package registers the built-in front-ends (``fusionkit list`` shows them).
"""

from fusionkit.frontends.fbank import AUDIOSET_MEAN, AUDIOSET_STD, KaldiFbank

__all__ = ["AUDIOSET_MEAN", "AUDIOSET_STD", "KaldiFbank"]
