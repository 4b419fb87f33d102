"""The launch's engine (DDP, FSDP2, ZeRO-2/3) and what each rank holds after step 1."""
