"""Correctness checks that need CUDA (pytest marker `gpu`, skipped without it; `bash bench/gpu_all.sh 7` runs them)."""
