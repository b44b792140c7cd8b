"""LoRA injection (peft), export to kohya-format files, and import of existing LoRAs."""
