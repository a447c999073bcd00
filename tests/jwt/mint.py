"""Mint real tokens with the JWT libraries of Python backends, for tests/serve_jwt_libraries.rs.

Each framework signs exactly as an application using it would, with its defaults:

* flask-jwt-extended: create_access_token / create_refresh_token in an app context
  (claims: sub, type, fresh, jti, iat, nbf, exp), and the cookies that set_access_cookies
  and set_refresh_cookies write with JWT_TOKEN_LOCATION=cookies, taken from a real
  response of the Flask test client;
* djangorestframework-simplejwt: RefreshToken.for_user on a django.contrib.auth User
  (claims: token_type, exp, iat, jti, user_id as an integer), and its .access_token;
* PyJWT the FastAPI way (FastAPI's security tutorial): jwt.encode of sub and exp, here
  with a `type` claim that tells access from refresh tokens, and one token with a numeric
  `sub` as older PyJWT backends and many Node backends send.

Usage: python mint.py SECRET. Prints one JSON object: for each framework, the user id it
signed for and its tokens.
"""

import datetime
import json
import sys


def flask_tokens(secret: str, user: str) -> dict:
    from flask import Flask, jsonify
    from flask_jwt_extended import (
        JWTManager,
        create_access_token,
        create_refresh_token,
        set_access_cookies,
        set_refresh_cookies,
    )

    app = Flask("notifyd-test")
    app.config["JWT_SECRET_KEY"] = secret
    app.config["JWT_TOKEN_LOCATION"] = ["headers", "cookies"]
    JWTManager(app)

    @app.post("/login")
    def login():
        response = jsonify(ok=True)
        set_access_cookies(response, create_access_token(identity=user))
        set_refresh_cookies(response, create_refresh_token(identity=user))
        return response

    with app.app_context():
        access = create_access_token(identity=user)
        refresh = create_refresh_token(identity=user)
    login_response = app.test_client().post("/login")
    assert login_response.status_code == 200, login_response.status_code
    return {
        "user": user,
        "access": access,
        "refresh": refresh,
        "set_cookie": login_response.headers.getlist("Set-Cookie"),
    }


def django_tokens(secret: str, user_id: int) -> dict:
    import django
    from django.conf import settings

    settings.configure(
        SECRET_KEY=secret,
        INSTALLED_APPS=[
            "django.contrib.contenttypes",
            "django.contrib.auth",
            "rest_framework",
            "rest_framework_simplejwt",
        ],
        # simplejwt signs with SECRET_KEY unless SIMPLE_JWT["SIGNING_KEY"] says otherwise.
        SIMPLE_JWT={},
        USE_TZ=True,
    )
    django.setup()
    from django.contrib.auth.models import User
    from rest_framework_simplejwt.tokens import RefreshToken

    # An unsaved user: for_user reads its id and nothing else touches a database.
    refresh = RefreshToken.for_user(User(id=user_id, username="bob"))
    return {
        "user": str(user_id),
        "access": str(refresh.access_token),
        "refresh": str(refresh),
    }


def pyjwt_tokens(secret: str, user: str, numeric_user: int) -> dict:
    import jwt

    now = datetime.datetime.now(tz=datetime.timezone.utc)

    def encode(claims: dict, lifetime: datetime.timedelta) -> str:
        return jwt.encode({**claims, "exp": now + lifetime}, secret, algorithm="HS256")

    return {
        "user": user,
        "access": encode({"sub": user, "type": "access"}, datetime.timedelta(minutes=15)),
        "refresh": encode({"sub": user, "type": "refresh"}, datetime.timedelta(days=7)),
        "numeric_user": str(numeric_user),
        "numeric": encode({"sub": numeric_user, "type": "access"}, datetime.timedelta(minutes=15)),
    }


def main() -> None:
    secret = sys.argv[1]
    print(
        json.dumps(
            {
                "flask": flask_tokens(secret, "alice"),
                "django": django_tokens(secret, 42),
                "pyjwt": pyjwt_tokens(secret, "carol", 7),
            }
        )
    )


if __name__ == "__main__":
    main()
