"""The run's own files, local or gs://, through one seam (`files`)."""
