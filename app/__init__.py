"""The desktop application shell (main window, menus, training controller); Qt lives here and in widgets/."""
