"""Small real models on real data that ship with the packages (no download), for demos and tests."""
