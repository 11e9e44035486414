"""Low-level compute for the teacher: mean-field message passing and Sinkhorn, each with a plain PyTorch
reference, a fast CPU path and a CUDA path behind one function."""
