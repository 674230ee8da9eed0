"""PyTorch export and import of backbones (torchvision ResNet, timm ViT); see `export/torch.py`."""
