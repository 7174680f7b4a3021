"""The features layer: Feast store helpers (config, online reads and pushes, materialisation, embeddings)."""
