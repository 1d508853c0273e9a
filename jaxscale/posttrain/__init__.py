"""Post-training: supervised fine-tuning on chat data with the loss on the assistant's tokens only (SFT), and
direct preference optimization on chosen / rejected pairs (DPO), through the same sharded step as pretraining."""
