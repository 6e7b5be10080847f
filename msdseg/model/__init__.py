"""The U-Net, its checkpoint format and sliding-window inference; shared by training and inference."""
