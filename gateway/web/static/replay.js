// Resend the kept form at once; the button stays for browsers without scripts.
document.getElementById("replay").submit();
