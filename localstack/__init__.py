"""The local AWS: the embedded emulator (moto server), kinesis-mock, and LocalStack files."""
