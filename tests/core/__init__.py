"""The core package (heapsync/): contracts, settings, the producer, the import layers."""
