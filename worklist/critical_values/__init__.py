"""Critical values (危急值): alerts raised when a critical finding is signed, the clinic's
read-back acknowledgement, escalation of unacknowledged alerts, the register."""
