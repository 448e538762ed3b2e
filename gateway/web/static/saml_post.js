// Send the SAML message to the IdP at once; the button stays for browsers without scripts.
document.getElementById("saml-post").submit();
