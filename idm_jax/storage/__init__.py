"""Where bytes live: the path layer (local or gs://), image bytes, the workdir lock, the dlib model files."""
