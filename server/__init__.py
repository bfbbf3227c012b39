"""xkt owner side: source training, signing, provisioning, serving."""
