"""The pipeline's stages, one recipe per module; dvc.yaml runs them in order."""
