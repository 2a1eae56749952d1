"""Signal front-ends (waveform -> features)."""
