"""Software twins of devices: Modbus servers (TCP and RTU) with physics behind the registers.

Imports ``drivers`` only, for register layouts.
"""
