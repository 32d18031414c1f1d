"""Model Workbench's engine: pure PyTorch fine-tuning (config, data, models, training, CLI); never imports Qt."""
