"""Weight files, read without running anything from them: `.npz` / structured `.npy`
(`npz`), `.safetensors` (`safetensors_file`) and `torch.save` archives (`torch_zip`, a
restricted unpickler); `state_dict` picks the reader of a PyTorch-world file by its suffix.
What the names inside mean is the reader's caller's business (a backbone's loader, exports,
lpt_jax.convert)."""
