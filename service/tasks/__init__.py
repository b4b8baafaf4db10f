"""Image tasks: submission (debit + insert), reading, cancelling (+refund), serving images, and the workers."""
