"""Self-configuration: dataset fingerprint, preprocessing, network and a training plan fitted to device and budget."""
