"""The demo: traffic generator, the end-to-end `make demo` run and the live view."""
