"""Reading results honestly: statistics over runs (`stats`) and PNG plots (`plots`)."""
