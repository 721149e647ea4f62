"""Op layer: fake (meta) and autograd registrations of fastllm's custom ops, the Triton
ops, and the single place each public function picks its backend (fastllm.backend)."""
